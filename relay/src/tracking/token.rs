//! Tracking tokens: what a tracked link or pixel carries, sealed with
//! HMAC-SHA256 so it cannot be forged into an open redirect.
//!
//! Layout before URL-safe base64 (no padding):
//! `version(1) kind(1) len(1) queue_id len(1) recipient len(1) domain len(2) url mac(32)`.
//! The MAC covers everything before it. A token that does not decode,
//! carries an unknown version or kind, has lengths that do not add up or a
//! MAC that does not verify is refused as a whole: nothing from it is used.

use std::path::{Path, PathBuf};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::hmac;

const VERSION: u8 = 1;
const MAC_LEN: usize = 32;
/// Longest queue id carried.
pub const MAX_QUEUE_ID: usize = 64;
/// Longest recipient carried (RFC 5321 path limit).
pub const MAX_RECIPIENT: usize = 254;
/// Longest sending domain carried.
pub const MAX_DOMAIN: usize = 253;
/// Longest URL a click token carries; longer links are left untracked.
pub const MAX_URL: usize = 2048;
/// Longest token accepted, in characters (every field at its maximum).
pub const MAX_TOKEN: usize =
    (2 + 1 + MAX_QUEUE_ID + 1 + MAX_RECIPIENT + 1 + MAX_DOMAIN + 2 + MAX_URL + MAC_LEN).div_ceil(3)
        * 4;
/// Shortest secret accepted in a key file.
pub const MIN_SECRET: usize = 32;
/// Purpose label of the tracking key: other uses of the same key file
/// (the feedback tokens) derive their own key with their own label.
pub const TRACKING_PURPOSE: &[u8] = b"petrel tracking token v1";

/// What a token is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// The open pixel.
    Open,
    /// A tracked link.
    Click,
}

impl Kind {
    fn byte(self) -> u8 {
        match self {
            Kind::Open => b'o',
            Kind::Click => b'c',
        }
    }
}

/// What a token says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Claims {
    /// Open or click.
    pub kind: Kind,
    /// Queue id of the message.
    pub queue_id: String,
    /// The recipient; empty when the message went to several (one body for
    /// all of them).
    pub recipient: String,
    /// The sending domain.
    pub sending_domain: String,
    /// The original URL (clicks only; empty for opens).
    pub url: String,
}

/// Why a token could not be made or was refused.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// A field is longer than a token carries.
    #[error("{0} is too long for a tracking token")]
    TooLong(&'static str),
    /// Not a token of ours (bad encoding, length, version or MAC).
    #[error("invalid tracking token")]
    Invalid,
    /// The key file could not be read or created.
    #[error("key file {path}: {reason}")]
    KeyFile {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

/// The key that seals and opens tokens.
#[derive(Clone)]
pub struct TokenKey {
    key: hmac::Key,
}

impl std::fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenKey(..)")
    }
}

impl TokenKey {
    /// Derives the key for `purpose` from a shared secret, so one secret
    /// can key several token kinds without one kind's MAC being valid as
    /// another's.
    pub fn derive(secret: &[u8], purpose: &[u8]) -> TokenKey {
        let master = hmac::Key::new(hmac::HMAC_SHA256, secret);
        let derived = hmac::sign(&master, purpose);
        TokenKey {
            key: hmac::Key::new(hmac::HMAC_SHA256, derived.as_ref()),
        }
    }

    /// Reads the secret in `path` (trailing white space ignored, at least
    /// [`MIN_SECRET`] bytes) and derives the tracking key.
    pub fn load(path: &Path) -> Result<TokenKey, TokenError> {
        Ok(TokenKey::derive(&load_secret(path)?, TRACKING_PURPOSE))
    }

    /// [`TokenKey::load`], creating the file with a new random secret
    /// (mode 0600) when it does not exist. For a local run with the
    /// embedded queue only: pods sharing Redis need one key for all.
    pub fn load_or_create(path: &Path) -> Result<(TokenKey, bool), TokenError> {
        let (secret, created) = load_or_create_secret(path)?;
        Ok((TokenKey::derive(&secret, TRACKING_PURPOSE), created))
    }

    /// HMAC-SHA256 of `data` under this key (other token kinds, such as
    /// the feedback tokens, build their own layouts on it).
    pub fn sign(&self, data: &[u8]) -> hmac::Tag {
        hmac::sign(&self.key, data)
    }

    /// Whether `mac` is the first `mac.len()` bytes (at least 8) of
    /// [`TokenKey::sign`]`(data)`, compared in constant time.
    pub fn verify_truncated(&self, data: &[u8], mac: &[u8]) -> bool {
        if mac.len() < 8 {
            return false;
        }
        let full = self.sign(data);
        // Every byte is compared whatever the first difference, so the
        // time taken tells an attacker nothing about how close a guess was.
        full.as_ref().get(..mac.len()).is_some_and(|expected| {
            expected
                .iter()
                .zip(mac)
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
        })
    }

    /// Seals `claims` into a token.
    pub fn seal(&self, claims: &Claims) -> Result<String, TokenError> {
        let field = |s: &str, max: usize, name: &'static str| {
            if s.len() > max {
                Err(TokenError::TooLong(name))
            } else {
                Ok(())
            }
        };
        field(&claims.queue_id, MAX_QUEUE_ID, "queue id")?;
        field(&claims.recipient, MAX_RECIPIENT, "recipient")?;
        field(&claims.sending_domain, MAX_DOMAIN, "sending domain")?;
        field(&claims.url, MAX_URL, "URL")?;
        let mut raw = Vec::with_capacity(8 + claims.url.len() + 128);
        raw.push(VERSION);
        raw.push(claims.kind.byte());
        for s in [&claims.queue_id, &claims.recipient, &claims.sending_domain] {
            raw.push(s.len() as u8);
            raw.extend_from_slice(s.as_bytes());
        }
        raw.extend_from_slice(&(claims.url.len() as u16).to_be_bytes());
        raw.extend_from_slice(claims.url.as_bytes());
        let mac = hmac::sign(&self.key, &raw);
        raw.extend_from_slice(mac.as_ref());
        Ok(URL_SAFE_NO_PAD.encode(raw))
    }

    /// Opens a token, refusing anything not sealed by this key.
    pub fn open(&self, token: &str) -> Result<Claims, TokenError> {
        if token.len() > MAX_TOKEN {
            return Err(TokenError::Invalid);
        }
        let raw = URL_SAFE_NO_PAD
            .decode(token)
            .map_err(|_| TokenError::Invalid)?;
        if raw.len() < MAC_LEN + 7 {
            return Err(TokenError::Invalid);
        }
        let (body, mac) = raw.split_at(raw.len() - MAC_LEN);
        hmac::verify(&self.key, body, mac).map_err(|_| TokenError::Invalid)?;
        // Authentic from here on; still parse defensively.
        parse(body).ok_or(TokenError::Invalid)
    }
}

/// Reads a key file's secret: its bytes with trailing white space
/// removed, at least [`MIN_SECRET`] of them. Every token kind derives its
/// own key from it ([`TokenKey::derive`]).
pub fn load_secret(path: &Path) -> Result<Vec<u8>, TokenError> {
    let bytes = std::fs::read(path).map_err(|e| TokenError::KeyFile {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    let secret = bytes.trim_ascii_end();
    if secret.len() < MIN_SECRET {
        return Err(TokenError::KeyFile {
            path: path.to_path_buf(),
            reason: format!(
                "holds {} bytes; at least {MIN_SECRET} are needed",
                secret.len()
            ),
        });
    }
    Ok(secret.to_vec())
}

/// [`load_secret`], creating the file with a new random secret (mode
/// 0600) when it does not exist; true when it was created.
pub fn load_or_create_secret(path: &Path) -> Result<(Vec<u8>, bool), TokenError> {
    if path.exists() {
        return load_secret(path).map(|k| (k, false));
    }
    let err = |e: std::io::Error| TokenError::KeyFile {
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    let secret: [u8; 32] = rand::random();
    let text = format!("{}\n", URL_SAFE_NO_PAD.encode(secret));
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(path).map_err(err)?;
    std::io::Write::write_all(&mut file, text.as_bytes()).map_err(err)?;
    file.sync_all().map_err(err)?;
    load_secret(path).map(|k| (k, true))
}

fn parse(body: &[u8]) -> Option<Claims> {
    let (&version, rest) = body.split_first()?;
    if version != VERSION {
        return None;
    }
    let (&kind, mut rest) = rest.split_first()?;
    let kind = match kind {
        b'o' => Kind::Open,
        b'c' => Kind::Click,
        _ => return None,
    };
    let take = |len: usize, rest: &mut &[u8]| -> Option<String> {
        if rest.len() < len {
            return None;
        }
        let (s, r) = rest.split_at(len);
        *rest = r;
        String::from_utf8(s.to_vec()).ok()
    };
    let short = |rest: &mut &[u8]| {
        let (&len, r) = rest.split_first()?;
        *rest = r;
        take(usize::from(len), rest)
    };
    let queue_id = short(&mut rest)?;
    let recipient = short(&mut rest)?;
    let sending_domain = short(&mut rest)?;
    if rest.len() < 2 {
        return None;
    }
    let len = usize::from(u16::from_be_bytes([rest[0], rest[1]]));
    rest = &rest[2..];
    if rest.len() != len {
        return None;
    }
    let url = String::from_utf8(rest.to_vec()).ok()?;
    let lower = url.get(..8).unwrap_or(&url).to_ascii_lowercase();
    if kind == Kind::Click && !(lower.starts_with("https://") || lower.starts_with("http://")) {
        return None;
    }
    Some(Claims {
        kind,
        queue_id,
        recipient,
        sending_domain,
        url,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> TokenKey {
        TokenKey::derive(&[7u8; 32], TRACKING_PURPOSE)
    }

    fn click(url: &str) -> Claims {
        Claims {
            kind: Kind::Click,
            queue_id: "0123456789abcdef0123456789abcdef".into(),
            recipient: "rcpt@dest.example".into(),
            sending_domain: "example.com".into(),
            url: url.into(),
        }
    }

    #[test]
    fn round_trips() {
        let table = [
            click("https://shop.example/p?a=1&b=2#x"),
            click(&format!(
                "https://long.example/{}",
                "x".repeat(MAX_URL - 25)
            )),
            Claims {
                kind: Kind::Open,
                url: String::new(),
                recipient: String::new(),
                ..click("")
            },
            click("HTTP://UPPER.example/é"),
        ];
        for claims in table {
            let token = key().seal(&claims).unwrap();
            assert!(token.len() <= MAX_TOKEN);
            assert!(
                token
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            );
            assert_eq!(key().open(&token).unwrap(), claims);
        }
    }

    #[test]
    fn refuses_what_it_did_not_seal() {
        let good = key().seal(&click("https://shop.example/")).unwrap();
        let other_key = TokenKey::derive(&[8u8; 32], TRACKING_PURPOSE);
        let other_purpose = TokenKey::derive(&[7u8; 32], b"petrel feedback v1");
        let forged = other_key.seal(&click("https://evil.example/")).unwrap();
        let mut flipped = good.clone().into_bytes();
        flipped[10] = if flipped[10] == b'A' { b'B' } else { b'A' };
        let table: Vec<(&str, String)> = vec![
            ("truncated", good[..good.len() - 1].to_string()),
            ("truncated to half", good[..good.len() / 2].to_string()),
            ("empty", String::new()),
            ("flipped byte", String::from_utf8(flipped).unwrap()),
            ("other key", forged),
            (
                "other purpose",
                other_purpose.seal(&click("https://shop.example/")).unwrap(),
            ),
            ("not base64", "!!!!".repeat(20)),
            ("padded", format!("{good}==")),
            ("too long", "A".repeat(MAX_TOKEN + 4)),
            ("appended", format!("{good}AAAA")),
        ];
        for (name, token) in table {
            assert!(
                matches!(key().open(&token), Err(TokenError::Invalid)),
                "{name}"
            );
        }
    }

    #[test]
    fn refuses_fields_too_long_to_carry() {
        let table = [
            ("URL", click(&"h".repeat(MAX_URL + 1))),
            (
                "recipient",
                Claims {
                    recipient: "r".repeat(255),
                    ..click("https://a.b/")
                },
            ),
            (
                "queue id",
                Claims {
                    queue_id: "q".repeat(65),
                    ..click("https://a.b/")
                },
            ),
        ];
        for (what, claims) in table {
            assert!(
                matches!(key().seal(&claims), Err(TokenError::TooLong(w)) if w == what),
                "{what}"
            );
        }
    }

    #[test]
    fn key_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/tracking.key");
        let (created, new) = TokenKey::load_or_create(&path).unwrap();
        assert!(new);
        let (again, new) = TokenKey::load_or_create(&path).unwrap();
        assert!(!new);
        let token = created.seal(&click("https://a.example/")).unwrap();
        assert!(
            again.open(&token).is_ok(),
            "the same file gives the same key"
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let short = dir.path().join("short");
        std::fs::write(&short, "too short\n").unwrap();
        assert!(matches!(
            TokenKey::load(&short),
            Err(TokenError::KeyFile { .. })
        ));
        assert!(matches!(
            TokenKey::load(&dir.path().join("missing")),
            Err(TokenError::KeyFile { .. })
        ));
    }
}
