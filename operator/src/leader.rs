//! Leader election through a `coordination.k8s.io/v1` Lease, so two operator
//! replicas never reconcile at once. The decision is a pure function of the
//! Lease and the time; the loop around it renews every `renew_every` and
//! reports leadership on a watch channel.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::Api;
use kube::api::PostParams;
use tokio::sync::watch;

/// What to do with the Lease.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Nobody holds it (or the holder let it expire): take it.
    Acquire,
    /// We hold it: renew.
    Renew,
    /// Someone else holds a live lease.
    Follow,
}

/// Pure leadership decision.
pub fn decide(spec: Option<&LeaseSpec>, identity: &str, now: Timestamp) -> Decision {
    let Some(spec) = spec else {
        return Decision::Acquire;
    };
    match spec.holder_identity.as_deref() {
        Some(holder) if holder == identity => Decision::Renew,
        None | Some("") => Decision::Acquire,
        Some(_) => {
            let duration =
                SignedDuration::from_secs(i64::from(spec.lease_duration_seconds.unwrap_or(15)));
            let expired = spec.renew_time.as_ref().is_none_or(|renewed| {
                renewed.0.saturating_add(duration).unwrap_or(Timestamp::MAX) < now
            });
            if expired {
                Decision::Acquire
            } else {
                Decision::Follow
            }
        }
    }
}

/// A Lease-based lock.
pub struct LeaseLock {
    /// Lease API in the operator's namespace.
    pub api: Api<Lease>,
    /// Lease name.
    pub name: String,
    /// This replica's identity (pod name).
    pub identity: String,
    /// How long a lease lives without renewal.
    pub lease_duration: Duration,
}

impl LeaseLock {
    /// One round: returns whether we hold the lease afterwards. Conflicts (another
    /// replica won the race) are "not leader", never errors.
    pub async fn try_acquire_or_renew(&self, now: Timestamp) -> Result<bool, kube::Error> {
        let current = self.api.get_opt(&self.name).await?;
        let decision = decide(
            current.as_ref().and_then(|l| l.spec.as_ref()),
            &self.identity,
            now,
        );
        if decision == Decision::Follow {
            return Ok(false);
        }
        let previous = current
            .as_ref()
            .and_then(|l| l.spec.clone())
            .unwrap_or_default();
        let spec = LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(
                i32::try_from(self.lease_duration.as_secs()).unwrap_or(15),
            ),
            acquire_time: match decision {
                Decision::Renew => previous.acquire_time.clone(),
                _ => Some(MicroTime(now)),
            },
            renew_time: Some(MicroTime(now)),
            lease_transitions: match decision {
                Decision::Acquire if current.is_some() => {
                    Some(previous.lease_transitions.unwrap_or(0) + 1)
                }
                _ => previous.lease_transitions,
            },
            ..Default::default()
        };
        let result = match current {
            Some(mut lease) => {
                // resourceVersion makes the replace fail if someone else wrote first.
                lease.spec = Some(spec);
                self.api
                    .replace(&self.name, &PostParams::default(), &lease)
                    .await
                    .map(|_| ())
            }
            None => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.name.clone()),
                        ..Default::default()
                    },
                    spec: Some(spec),
                };
                self.api
                    .create(&PostParams::default(), &lease)
                    .await
                    .map(|_| ())
            }
        };
        match result {
            Ok(()) => Ok(true),
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
            Err(err) => Err(err),
        }
    }

    /// Renews forever, publishing leadership on `leader`.
    pub async fn run(self, leader: watch::Sender<bool>, renew_every: Duration) {
        loop {
            let held = match self.try_acquire_or_renew(Timestamp::now()).await {
                Ok(held) => held,
                Err(err) => {
                    tracing::warn!(error = %err, "lease renewal failed");
                    false
                }
            };
            leader.send_replace(held);
            tokio::time::sleep(renew_every).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(holder: &str, renewed: i64) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(holder.into()),
            lease_duration_seconds: Some(15),
            renew_time: Some(MicroTime(Timestamp::from_second(renewed).expect("ts"))),
            ..Default::default()
        }
    }

    #[test]
    fn decisions() {
        let now = Timestamp::from_second(1000).expect("ts");
        assert_eq!(decide(None, "a", now), Decision::Acquire);
        assert_eq!(decide(Some(&lease("a", 990)), "a", now), Decision::Renew);
        assert_eq!(decide(Some(&lease("b", 990)), "a", now), Decision::Follow);
        assert_eq!(decide(Some(&lease("b", 900)), "a", now), Decision::Acquire);
        assert_eq!(decide(Some(&lease("", 999)), "a", now), Decision::Acquire);
    }
}
