//! SMTP AUTH: the users file, password hashes, and SASL PLAIN/LOGIN decoding.
//!
//! Passwords are stored as argon2id PHC strings (`user:$argon2id$...`), so a
//! leaked Secret does not leak passwords. Verification is deliberately slow
//! and runs on the blocking pool, never on the session's task.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use argon2::Argon2;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;

use crate::reload::Reloading;

/// Why the users file or a password could not be used.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The file could not be read.
    #[error("cannot read users file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A line is not `user:$argon2...`.
    #[error("users file {path} line {line}: {reason}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What was wrong.
        reason: String,
    },
    /// Hashing failed (should not happen with valid parameters).
    #[error("cannot hash password: {0}")]
    Hash(String),
}

/// AUTH users and their password hashes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Users {
    hashes: HashMap<String, String>,
}

impl Users {
    /// Parses `user:hash` lines; blank lines and `#` comments are skipped.
    pub fn parse(text: &str, path: &Path) -> Result<Users, AuthError> {
        let mut hashes = HashMap::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let err = |reason: &str| AuthError::Parse {
                path: path.to_path_buf(),
                line: i + 1,
                reason: reason.to_string(),
            };
            let (user, hash) = line
                .split_once(':')
                .ok_or_else(|| err("expected user:hash"))?;
            if user.is_empty() {
                return Err(err("empty user name"));
            }
            PasswordHash::new(hash).map_err(|e| err(&format!("not a PHC password hash: {e}")))?;
            if hashes.insert(user.to_string(), hash.to_string()).is_some() {
                return Err(err("user listed twice"));
            }
        }
        Ok(Users { hashes })
    }

    /// Reads and parses a users file.
    pub fn load(path: &Path) -> Result<Users, AuthError> {
        let text = std::fs::read_to_string(path).map_err(|source| AuthError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Users::parse(&text, path)
    }

    /// Loads `path` and re-reads it when it changes; a broken edit is
    /// logged and the previous users are kept.
    pub fn watch(path: &Path) -> Result<Reloading<Users>, AuthError> {
        let initial = Users::load(path)?;
        let file = path.to_path_buf();
        Ok(Reloading::spawn(
            vec![file.clone()],
            crate::config::RELOAD_INTERVAL,
            initial,
            move |_| match Users::load(&file) {
                Ok(users) => {
                    tracing::info!(path = %file.display(), users = users.len(), "users file reloaded");
                    Some(users)
                }
                Err(error) => {
                    tracing::error!(%error, "users file change refused; keeping the previous users");
                    None
                }
            },
        ))
    }

    /// Number of users.
    pub fn len(&self) -> usize {
        self.hashes.len()
    }

    /// True when there are no users.
    pub fn is_empty(&self) -> bool {
        self.hashes.is_empty()
    }

    /// The stored hash of `user`.
    pub fn hash_of(&self, user: &str) -> Option<&str> {
        self.hashes.get(user).map(String::as_str)
    }
}

/// A fixed hash verified for unknown users, so that a wrong user name costs
/// as much time as a wrong password and names cannot be probed by timing.
const DUMMY_HASH: &str = "$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHRzb21lc2FsdA$0kJ5vSIjlwQ6yGXrjdQzjLBQ9KHbmsjjnH4D0J1JzJk";

/// Checks `password` against `user`'s hash (CPU-heavy: call off the
/// async runtime).
pub fn verify(users: &Users, user: &str, password: &str) -> bool {
    let (hash, known) = match users.hash_of(user) {
        Some(h) => (h, true),
        None => (DUMMY_HASH, false),
    };
    let Ok(parsed) = PasswordHash::new(hash) else {
        return false;
    };
    let ok = Argon2::default()
        .verify_password(password.as_bytes(), &parsed)
        .is_ok();
    ok && known
}

/// Hashes a password for the users file (argon2id, default parameters,
/// random salt): what `petrel-relay hash-password` prints.
pub fn hash_password(password: &str) -> Result<String, AuthError> {
    let mut bytes = [0u8; 16];
    rand::Rng::fill(&mut rand::rng(), &mut bytes);
    let salt = SaltString::encode_b64(&bytes).map_err(|e| AuthError::Hash(e.to_string()))?;
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| AuthError::Hash(e.to_string()))
}

/// Why a SASL response could not be decoded (501 5.5.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SaslError {
    /// Not base64.
    Base64,
    /// Not `authzid NUL authcid NUL password`.
    Plain,
    /// Not UTF-8.
    Utf8,
}

/// Decodes one base64 response line; `=` is the empty response.
pub fn decode_b64(line: &str) -> Result<Vec<u8>, SaslError> {
    let line = line.trim();
    if line == "=" {
        return Ok(Vec::new());
    }
    B64.decode(line).map_err(|_| SaslError::Base64)
}

/// Decodes a PLAIN response into (user, password). An authorization id, if
/// given, must equal the user: we do not let one user act as another.
pub fn decode_plain(line: &str) -> Result<(String, String), SaslError> {
    let raw = decode_b64(line)?;
    let mut parts = raw.split(|b| *b == 0);
    let (Some(authz), Some(user), Some(pass), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(SaslError::Plain);
    };
    let user = String::from_utf8(user.to_vec()).map_err(|_| SaslError::Utf8)?;
    let pass = String::from_utf8(pass.to_vec()).map_err(|_| SaslError::Utf8)?;
    if user.is_empty() || (!authz.is_empty() && authz != user.as_bytes()) {
        return Err(SaslError::Plain);
    }
    Ok((user, pass))
}

/// Decodes a LOGIN step (user name or password).
pub fn decode_login(line: &str) -> Result<String, SaslError> {
    String::from_utf8(decode_b64(line)?).map_err(|_| SaslError::Utf8)
}

/// Base64 of a server challenge.
pub fn encode_b64(text: &str) -> String {
    B64.encode(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_then_verify() {
        let hash = hash_password("s3cret").unwrap();
        assert!(hash.starts_with("$argon2id$"));
        let users =
            Users::parse(&format!("# users\nalice:{hash}\n\n"), Path::new("users")).unwrap();
        assert_eq!(users.len(), 1);
        assert!(verify(&users, "alice", "s3cret"));
        assert!(!verify(&users, "alice", "wrong"));
        assert!(!verify(&users, "mallory", "s3cret"));
    }

    #[test]
    fn dummy_hash_parses() {
        assert!(PasswordHash::new(DUMMY_HASH).is_ok());
    }

    #[test]
    fn bad_users_files() {
        for text in [
            "alice",
            "alice:plaintext",
            ":$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHQ$abc",
        ] {
            assert!(Users::parse(text, Path::new("u")).is_err(), "{text}");
        }
    }

    #[test]
    fn sasl_plain() {
        let enc = |s: &[u8]| B64.encode(s);
        assert_eq!(
            decode_plain(&enc(b"\0alice\0pw")),
            Ok(("alice".into(), "pw".into()))
        );
        assert_eq!(
            decode_plain(&enc(b"alice\0alice\0pw")),
            Ok(("alice".into(), "pw".into()))
        );
        assert_eq!(decode_plain(&enc(b"bob\0alice\0pw")), Err(SaslError::Plain));
        assert_eq!(decode_plain(&enc(b"alice\0pw")), Err(SaslError::Plain));
        assert_eq!(decode_plain("!!!"), Err(SaslError::Base64));
        assert_eq!(decode_login(&enc(b"alice")), Ok("alice".into()));
        assert_eq!(decode_login("="), Ok(String::new()));
    }
}
