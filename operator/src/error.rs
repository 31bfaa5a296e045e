//! The operator's error type: one variant per pipeline step, each with a
//! stable [`Error::category`] used as a metric label and Event reason.

use std::fmt;

/// A spec the operator cannot act on. It becomes a condition with this reason
/// and message (never a crash loop) and the controller waits for a change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidSpec {
    /// CamelCase condition reason, for example `UnknownRelay`.
    pub reason: &'static str,
    /// What is wrong and how to fix it, for a person.
    pub message: String,
}

impl InvalidSpec {
    /// An invalid spec with a reason and message.
    pub fn new(reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            reason,
            message: message.into(),
        }
    }
}

impl fmt::Display for InvalidSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.reason, self.message)
    }
}

impl std::error::Error for InvalidSpec {}

/// Everything a reconcile can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The spec is invalid (permanent until the spec changes).
    #[error("invalid spec: {0}")]
    Validate(#[from] InvalidSpec),
    /// Building a desired object failed (rendering config, encoding).
    #[error("building desired objects: {0}")]
    Build(String),
    /// A Kubernetes API call failed (transient: requeued with backoff).
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// DKIM key generation failed.
    #[error("DKIM key generation: {0}")]
    Keygen(String),
    /// The object lacks something the API server always sets (name, namespace).
    #[error("malformed object: {0}")]
    Malformed(&'static str),
}

impl Error {
    /// A stable, low-cardinality label for metrics and Event reasons.
    pub fn category(&self) -> &'static str {
        match self {
            Error::Validate(_) => "InvalidSpec",
            Error::Build(_) => "BuildFailed",
            Error::Kube(_) => "ApiError",
            Error::Keygen(_) => "KeygenFailed",
            Error::Malformed(_) => "MalformedObject",
        }
    }
}

/// Result of a reconcile step.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Parses a spec duration such as `90d` or `1h30m`, naming the field on error.
pub fn parse_duration(field: &str, value: &str) -> Result<std::time::Duration, InvalidSpec> {
    humantime::parse_duration(value).map_err(|err| {
        InvalidSpec::new(
            "InvalidDuration",
            format!("{field}: {value:?} is not a duration like 5m, 12h or 90d ({err})"),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(
            parse_duration("x", "90d").expect("valid"),
            std::time::Duration::from_secs(90 * 86400)
        );
        assert_eq!(
            parse_duration("x", "1h30m").expect("valid"),
            std::time::Duration::from_secs(5400)
        );
        let err = parse_duration("spec.rotation.every", "soon").expect_err("invalid");
        assert!(err.message.starts_with("spec.rotation.every:"));
    }
}
