//! The feedback key: one secret (RelayConfig `feedback.keyFile`, or
//! `feedback.key` created beside the embedded queue for a local run) from
//! which the VERP and unsubscribe token keys are derived, each with its
//! own purpose label (so the same file may also be `tracking.keyFile`
//! without a tracking token ever opening as a feedback one).

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::config::RelayConfig;
use crate::tracking::TokenError;
use crate::tracking::token::{TokenKey, load_or_create_secret, load_secret};

/// Name of the key file the relay creates beside the embedded queue when
/// no `feedback.keyFile` is configured.
pub const GENERATED_KEY_FILE: &str = "feedback.key";

/// Purpose label of the VERP (`b+<token>`) key.
pub const VERP_PURPOSE: &[u8] = b"petrel feedback verp v1";
/// Purpose label of the unsubscribe URL token key.
pub const UNSUBSCRIBE_PURPOSE: &[u8] = b"petrel feedback unsubscribe v1";
/// Purpose label of the mailto unsubscribe (`u+<token>`) key.
pub const MAILTO_PURPOSE: &[u8] = b"petrel feedback mailto v1";

/// The keys that seal and open feedback tokens (see [`super::token`]).
/// Cheap to clone.
#[derive(Clone, Debug)]
pub struct FeedbackKeys {
    pub(super) verp: TokenKey,
    pub(super) unsubscribe: TokenKey,
    pub(super) mailto: TokenKey,
}

impl FeedbackKeys {
    /// Derives every feedback key from a shared secret.
    pub fn from_secret(secret: &[u8]) -> FeedbackKeys {
        FeedbackKeys {
            verp: TokenKey::derive(secret, VERP_PURPOSE),
            unsubscribe: TokenKey::derive(secret, UNSUBSCRIBE_PURPOSE),
            mailto: TokenKey::derive(secret, MAILTO_PURPOSE),
        }
    }

    /// Reads the secret in `path` (at least 32 bytes).
    pub fn load(path: &Path) -> Result<FeedbackKeys, TokenError> {
        Ok(FeedbackKeys::from_secret(&load_secret(path)?))
    }
}

/// Where `feedback.key` goes for a local run: beside the queue file.
pub fn generated_key_path(queue_file: &Path) -> PathBuf {
    queue_file
        .parent()
        .unwrap_or(Path::new("."))
        .join(GENERATED_KEY_FILE)
}

/// The feedback keys, loaded once (or created for a local run), shared by
/// the inbound side (feedback listener, unsubscribe headers), delivery
/// (the VERP sender) and the HTTP unsubscribe endpoints.
pub struct Feedback {
    /// The configured key file, or the one beside the embedded queue.
    path: Option<PathBuf>,
    /// Whether the relay may create `path` (no keyFile configured).
    create: bool,
    keys: Mutex<Option<FeedbackKeys>>,
}

impl std::fmt::Debug for Feedback {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Feedback")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl Feedback {
    /// Where the key comes from, per the config. A configured `keyFile` is
    /// read now, so a bad one stops the start with a clear error; the
    /// generated one is created now when some domain needs it
    /// ([`RelayConfig::feedback_key_needed`]), else on first use (a reload
    /// may add a `returnPathDomain`).
    pub fn new(config: &RelayConfig) -> Result<Feedback, TokenError> {
        let (path, create) = match (&config.feedback.key_file, &config.queue.embedded) {
            (Some(path), _) => (Some(path.clone()), false),
            (None, Some(embedded)) => (Some(generated_key_path(&embedded.path)), true),
            (None, None) => (None, false),
        };
        let feedback = Feedback {
            path,
            create,
            keys: Mutex::new(None),
        };
        if config.feedback.key_file.is_some() || config.feedback_key_needed() {
            feedback.keys()?;
        }
        Ok(feedback)
    }

    /// Fixed keys (tests, fuzzing).
    pub fn with_keys(keys: FeedbackKeys) -> Feedback {
        Feedback {
            path: None,
            create: false,
            keys: Mutex::new(Some(keys)),
        }
    }

    /// The keys, loading (or creating) them on first use.
    pub fn keys(&self) -> Result<FeedbackKeys, TokenError> {
        let mut guard = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(keys) = guard.as_ref() {
            return Ok(keys.clone());
        }
        let Some(path) = &self.path else {
            return Err(TokenError::KeyFile {
                path: PathBuf::new(),
                reason: "no feedback.keyFile configured".into(),
            });
        };
        let secret = if self.create {
            let (secret, created) = load_or_create_secret(path)?;
            if created {
                tracing::warn!(path = %path.display(), "no feedback.keyFile configured; created a feedback key beside the embedded queue");
            }
            secret
        } else {
            load_secret(path)?
        };
        let keys = FeedbackKeys::from_secret(&secret);
        *guard = Some(keys.clone());
        Ok(keys)
    }
}
