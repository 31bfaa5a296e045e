//! MTA-STS (RFC 8461): a recipient domain's published promise that its MX
//! hosts speak verified TLS.
//!
//! ```text
//! TXT _mta-sts.<domain> (id) --changed?--> fetch (HTTPS, verified) --> parse
//!        |                                    |  failure: keep the cached policy
//!        +--same id--> shared cache (SharedState, ttl max_age)
//! ```
//! `policy` is pure (parse, match); `fetch` is the thin HTTPS part; this
//! file decides which policy is in force, caching it for every pod.

pub mod fetch;
pub mod policy;

use hickory_resolver::TokioResolver;
use hickory_resolver::proto::rr::RData;
use serde::{Deserialize, Serialize};
use std::time::Duration;

use crate::queue::{Millis, SharedState, now_millis};
pub use fetch::{FetchError, FetchSettings};
pub use policy::{Mode, Policy, PolicyError};

/// How long a failed fetch is remembered (per TXT id), so every delivery
/// to a domain with a broken policy host does not wait for it again.
pub const FAILURE_MEMORY: Duration = Duration::from_secs(300);

/// A policy in the shared cache.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Cached {
    /// The TXT record's id when the policy was fetched.
    pub id: String,
    /// The policy.
    pub policy: Policy,
    /// When it was fetched.
    pub fetched_at: Millis,
}

/// What went wrong while discovering a policy, by TLS-RPT result type
/// (RFC 8460 section 4.3.2.2).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Problem {
    /// The policy could not be fetched (`sts-policy-fetch-error`).
    FetchError(String),
    /// The policy host's certificate was refused (`sts-webpki-invalid`).
    WebPkiInvalid(String),
    /// The policy did not parse (`sts-policy-invalid`).
    Invalid(String),
}

impl Problem {
    /// The TLS-RPT result type.
    pub fn result_type(&self) -> &'static str {
        match self {
            Problem::FetchError(_) => "sts-policy-fetch-error",
            Problem::WebPkiInvalid(_) => "sts-webpki-invalid",
            Problem::Invalid(_) => "sts-policy-invalid",
        }
    }

    /// What happened, for logs.
    pub fn detail(&self) -> &str {
        match self {
            Problem::FetchError(d) | Problem::WebPkiInvalid(d) | Problem::Invalid(d) => d,
        }
    }
}

/// The outcome of discovery for one domain.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Discovery {
    /// The policy in force, if any (`mode: none` included).
    pub policy: Option<Cached>,
    /// A failure on the way (the cached policy, if any, still applies).
    pub problem: Option<Problem>,
}

fn cache_key(domain: &str) -> String {
    format!("mta-sts:{domain}")
}

fn failure_key(domain: &str) -> String {
    format!("mta-sts-failed:{domain}")
}

/// The `_mta-sts` TXT id of `domain`: `Ok(None)` when the domain publishes
/// none (or not exactly one valid record), `Err` when DNS did not answer.
async fn txt_id(resolver: &TokioResolver, domain: &str) -> Result<Option<String>, String> {
    match resolver.txt_lookup(format!("_mta-sts.{domain}.")).await {
        Ok(lookup) => {
            let records: Vec<String> = lookup
                .answers()
                .iter()
                .filter_map(|r| match &r.data {
                    // A record split into several strings is one record.
                    RData::TXT(txt) => Some(
                        txt.txt_data
                            .iter()
                            .map(|s| String::from_utf8_lossy(s))
                            .collect::<String>(),
                    ),
                    _ => None,
                })
                .collect();
            Ok(policy::parse_txt(&records).ok())
        }
        Err(e) if e.is_nx_domain() || e.is_no_records_found() => Ok(None),
        Err(e) => Err(e.to_string()),
    }
}

/// The policy in force for `domain` (lower case, no final dot).
///
/// RFC 8461 section 5.1: a new TXT id triggers a fetch; a failed fetch, a
/// missing TXT record or a DNS failure leaves an unexpired cached policy in
/// force; with nothing cached the domain is treated as having no policy.
pub async fn discover(
    state: &dyn SharedState,
    settings: &FetchSettings,
    domain: &str,
) -> Discovery {
    let cached: Option<Cached> = match state.get_value(&cache_key(domain)).await {
        Ok(v) => v.and_then(|json| serde_json::from_str(&json).ok()),
        Err(error) => {
            tracing::warn!(%error, domain, "cannot read the MTA-STS cache");
            None
        }
    };
    let id = match txt_id(&settings.resolver, domain).await {
        Ok(Some(id)) => id,
        Ok(None) => {
            return Discovery {
                policy: cached,
                problem: None,
            };
        }
        Err(reason) => {
            tracing::debug!(domain, reason, "MTA-STS TXT lookup failed");
            return Discovery {
                policy: cached,
                problem: None,
            };
        }
    };
    if let Some(c) = &cached
        && c.id == id
    {
        return Discovery {
            policy: cached,
            problem: None,
        };
    }
    // A fetch that failed for this id a moment ago fails again: skip it.
    if let Ok(Some(remembered)) = state.get_value(&failure_key(domain)).await
        && let Some((failed_id, problem)) = decode_failure(&remembered)
        && failed_id == id
    {
        return Discovery {
            policy: cached,
            problem: Some(problem),
        };
    }
    match refresh(settings, domain).await {
        Ok(policy) => {
            let fresh = Cached {
                id,
                policy,
                fetched_at: now_millis(),
            };
            store(state, domain, &fresh).await;
            tracing::info!(domain, mode = fresh.policy.mode.as_str(), id = %fresh.id, "MTA-STS policy fetched");
            Discovery {
                policy: Some(fresh),
                problem: None,
            }
        }
        Err(problem) => {
            tracing::warn!(
                domain,
                result = problem.result_type(),
                detail = problem.detail(),
                cached = cached.is_some(),
                "MTA-STS policy not refreshed"
            );
            let _ = state
                .set_value(
                    &failure_key(domain),
                    &encode_failure(&id, &problem),
                    FAILURE_MEMORY,
                )
                .await;
            Discovery {
                policy: cached,
                problem: Some(problem),
            }
        }
    }
}

async fn store(state: &dyn SharedState, domain: &str, fresh: &Cached) {
    let ttl = Duration::from_secs(fresh.policy.max_age.max(1));
    match serde_json::to_string(fresh) {
        Ok(json) => {
            if let Err(error) = state.set_value(&cache_key(domain), &json, ttl).await {
                tracing::warn!(%error, domain, "cannot cache the MTA-STS policy");
            }
        }
        Err(error) => tracing::warn!(%error, domain, "cannot encode the MTA-STS policy"),
    }
}

fn refetch_key(domain: &str) -> String {
    format!("mta-sts-refetched:{domain}")
}

/// RFC 8461 section 5.1: when the cached `enforce` policy allows none of
/// the MX hosts, check for a new one before deferring, even though the TXT
/// id did not change (the current id is kept; `id` when DNS does not
/// answer). At most once per domain per [`FAILURE_MEMORY`] over all pods,
/// so a domain whose MX really is outside its policy costs one fetch per
/// five minutes, not one per message. `Err` when nothing new was had.
pub async fn refetch(
    state: &dyn SharedState,
    settings: &FetchSettings,
    domain: &str,
    id: &str,
) -> Result<Cached, Problem> {
    if let Ok(Some(_)) = state.get_value(&refetch_key(domain)).await {
        return Err(Problem::FetchError("refetched a moment ago".into()));
    }
    let _ = state
        .set_value(&refetch_key(domain), "1", FAILURE_MEMORY)
        .await;
    let id = match txt_id(&settings.resolver, domain).await {
        Ok(Some(current)) => current,
        Ok(None) | Err(_) => id.to_string(),
    };
    let policy = refresh(settings, domain).await?;
    let fresh = Cached {
        id,
        policy,
        fetched_at: now_millis(),
    };
    store(state, domain, &fresh).await;
    Ok(fresh)
}

async fn refresh(settings: &FetchSettings, domain: &str) -> Result<Policy, Problem> {
    let text = fetch::fetch(settings, domain).await.map_err(|e| {
        if e.is_certificate() {
            Problem::WebPkiInvalid(e.to_string())
        } else {
            Problem::FetchError(e.to_string())
        }
    })?;
    policy::parse_policy(&text).map_err(|e| Problem::Invalid(e.to_string()))
}

fn encode_failure(id: &str, problem: &Problem) -> String {
    format!("{id}\n{}\n{}", problem.result_type(), problem.detail())
}

fn decode_failure(text: &str) -> Option<(String, Problem)> {
    let mut parts = text.splitn(3, '\n');
    let id = parts.next()?.to_string();
    let kind = parts.next()?;
    let detail = parts.next().unwrap_or("").to_string();
    let problem = match kind {
        "sts-webpki-invalid" => Problem::WebPkiInvalid(detail),
        "sts-policy-invalid" => Problem::Invalid(detail),
        _ => Problem::FetchError(detail),
    };
    Some((id, problem))
}

/// The MX hosts an `enforce` policy allows, in their order; an error that
/// names them all when none is allowed.
pub fn allowed_hosts<H>(
    policy: &Policy,
    hosts: Vec<H>,
    name: impl Fn(&H) -> &str,
) -> Result<Vec<H>, String> {
    let all: Vec<String> = hosts.iter().map(|h| name(h).to_string()).collect();
    let allowed: Vec<H> = hosts
        .into_iter()
        .filter(|h| policy.allows(name(h)))
        .collect();
    if allowed.is_empty() {
        return Err(format!(
            "MTA-STS policy (mode enforce) allows none of the MX hosts {} (policy mx: {})",
            all.join(", "),
            policy.mx.join(", ")
        ));
    }
    Ok(allowed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_round_trip() {
        for p in [
            Problem::FetchError("timed out".into()),
            Problem::WebPkiInvalid("bad cert\nsecond line".into()),
            Problem::Invalid("no mode".into()),
        ] {
            let (id, back) = decode_failure(&encode_failure("abc", &p)).unwrap();
            assert_eq!(id, "abc");
            assert_eq!(back, p);
        }
    }

    #[test]
    fn enforce_keeps_only_matching_hosts_in_order() {
        let p = Policy {
            mode: Mode::Enforce,
            mx: vec!["*.dest.test".into(), "backup.example".into()],
            max_age: 86_400,
        };
        let hosts = vec!["mx2.dest.test", "evil.example", "backup.example"];
        assert_eq!(
            allowed_hosts(&p, hosts, |h| h).unwrap(),
            vec!["mx2.dest.test", "backup.example"]
        );
        let err = allowed_hosts(&p, vec!["evil.example"], |h| h).unwrap_err();
        assert!(
            err.contains("evil.example") && err.contains("*.dest.test"),
            "{err}"
        );
    }
}
