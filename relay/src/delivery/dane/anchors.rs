//! DNSSEC trust anchors: the built-in root keys (IANA's KSK-2017 and
//! KSK-2024, as hickory ships them) plus the DNSKEY records of
//! `delivery.mx.trustAnchorFile`, for private or test zones.

use std::path::Path;

use hickory_resolver::proto::dnssec::TrustAnchors;

/// Why the trust anchor file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum AnchorError {
    /// Unreadable or not DNSKEY records.
    #[error("delivery.mx.trustAnchorFile {path}: {reason}")]
    File {
        /// The file.
        path: String,
        /// What is wrong with it.
        reason: String,
    },
}

/// The root anchors, plus the keys in `file` when set.
pub fn load(file: Option<&Path>) -> Result<TrustAnchors, AnchorError> {
    let Some(path) = file else {
        return Ok(TrustAnchors::default());
    };
    let bad = |reason: String| AnchorError::File {
        path: path.display().to_string(),
        reason,
    };
    let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
    parse(&text).map_err(bad)
}

/// The root anchors plus the DNSKEY records in `text`.
pub fn parse(text: &str) -> Result<TrustAnchors, String> {
    let mut anchors: TrustAnchors = text.parse().map_err(|e| format!("{e}"))?;
    let has_keys = text
        .lines()
        .map(|l| l.split(';').next().unwrap_or("").trim())
        .any(|l| !l.is_empty());
    if !has_keys {
        return Err("no DNSKEY records".into());
    }
    let roots = TrustAnchors::default();
    for i in 0..roots.len() {
        if let Some(key) = roots.get(i) {
            anchors.insert(key);
        }
    }
    Ok(anchors)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_keys_add_to_the_root_anchors() {
        let line =
            "dane.test. 3600 IN DNSKEY 257 3 15 l02Woi0iS8Aa25FQkUd9RMzZHJpBoRQwAQEX1SxZJA4=";
        let anchors = parse(line).unwrap();
        assert_eq!(
            anchors.len(),
            TrustAnchors::default().len(),
            "root keys kept"
        );
        assert!(parse("; only a comment\n").is_err());
        assert!(parse("dane.test. IN DNSKEY nonsense").is_err());
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("anchors");
        let err = match load(Some(&missing)) {
            Ok(_) => panic!("a missing file loads"),
            Err(e) => e.to_string(),
        };
        assert!(err.contains("delivery.mx.trustAnchorFile"), "{err}");
    }
}
