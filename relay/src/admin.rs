//! The admin API's gate (`/admin/v1/...` on the HTTP port), reusable by
//! every admin endpoint: a request passes when its peer is loopback or in
//! `trustedNetworks`, or when `http.adminTokenFile` is set and it carries
//! `Authorization: Bearer <that token>`. Anything else gets 401 (a token
//! could help) or 403 (no token is configured), before any work is done.
//!
//! The token file is read per request, so rotating the mounted Secret
//! takes effect without a restart.

use std::net::IpAddr;
use std::path::Path;

use axum::http::{HeaderMap, StatusCode, header};
use ipnet::IpNet;

/// Why an admin request was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AdminDenied {
    /// No (or a wrong) bearer token, and a token would be accepted.
    #[error("admin API: missing or wrong bearer token")]
    Unauthorized,
    /// The peer is not trusted and no token is configured.
    #[error("admin API: only loopback and trustedNetworks may use it")]
    Forbidden,
    /// The token file cannot be read: refuse rather than open up.
    #[error("admin API: cannot read http.adminTokenFile: {0}")]
    TokenUnreadable(String),
}

impl AdminDenied {
    /// The HTTP status to answer with.
    pub fn status(&self) -> StatusCode {
        match self {
            AdminDenied::Unauthorized => StatusCode::UNAUTHORIZED,
            AdminDenied::Forbidden => StatusCode::FORBIDDEN,
            AdminDenied::TokenUnreadable(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

/// Compares without stopping at the first difference, so response time
/// does not reveal how much of a guess was right.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The decision, given the token (if one is configured).
pub fn decide(
    peer: IpAddr,
    headers: &HeaderMap,
    trusted: &[IpNet],
    token: Option<&str>,
) -> Result<(), AdminDenied> {
    let peer = match peer {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(peer, IpAddr::V4),
        v4 => v4,
    };
    if peer.is_loopback() || trusted.iter().any(|n| n.contains(&peer)) {
        return Ok(());
    }
    let Some(token) = token.filter(|t| !t.is_empty()) else {
        return Err(AdminDenied::Forbidden);
    };
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match presented {
        Some(p) if same(p.as_bytes(), token.as_bytes()) => Ok(()),
        _ => Err(AdminDenied::Unauthorized),
    }
}

/// Checks a request against the config: reads the token file when set.
pub async fn check(
    peer: IpAddr,
    headers: &HeaderMap,
    trusted: &[IpNet],
    token_file: Option<&Path>,
) -> Result<(), AdminDenied> {
    let token = match token_file {
        Some(path) => Some(
            tokio::fs::read_to_string(path)
                .await
                .map_err(|e| AdminDenied::TokenUnreadable(format!("{}: {e}", path.display())))?
                .trim()
                .to_string(),
        ),
        None => None,
    };
    decide(peer, headers, trusted, token.as_deref())
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn bearer(t: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_str(&format!("Bearer {t}")).unwrap(),
        );
        h
    }

    #[test]
    fn only_trusted_peers_or_the_token_pass() {
        let trusted: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let none = HeaderMap::new();
        let outside: IpAddr = "192.0.2.1".parse().unwrap();
        let (wrong, short, right, empty) = (
            bearer("wrong"),
            bearer("s3cre"),
            bearer("s3cret"),
            bearer(""),
        );
        type Case<'a> = (
            &'a str,
            &'a HeaderMap,
            Option<&'a str>,
            Result<(), AdminDenied>,
        );
        let table: Vec<Case> = vec![
            ("127.0.0.1", &none, None, Ok(())),
            ("::1", &none, None, Ok(())),
            ("::ffff:10.1.2.3", &none, None, Ok(())),
            ("10.1.2.3", &none, Some("s3cret"), Ok(())),
            ("192.0.2.1", &none, None, Err(AdminDenied::Forbidden)),
            (
                "192.0.2.1",
                &none,
                Some("s3cret"),
                Err(AdminDenied::Unauthorized),
            ),
            (
                "192.0.2.1",
                &wrong,
                Some("s3cret"),
                Err(AdminDenied::Unauthorized),
            ),
            (
                "192.0.2.1",
                &short,
                Some("s3cret"),
                Err(AdminDenied::Unauthorized),
            ),
            ("192.0.2.1", &right, Some("s3cret"), Ok(())),
            // An empty token file must not make an empty bearer valid.
            ("192.0.2.1", &empty, Some(""), Err(AdminDenied::Forbidden)),
        ];
        for (peer, headers, token, want) in table {
            let peer: IpAddr = peer.parse().unwrap();
            assert_eq!(
                decide(peer, headers, &trusted, token),
                want,
                "{peer} {token:?}"
            );
        }
        assert_eq!(AdminDenied::Unauthorized.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(
            decide(outside, &none, &[], None).unwrap_err().status(),
            StatusCode::FORBIDDEN
        );
    }
}
