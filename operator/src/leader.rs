//! Leader election through a `coordination.k8s.io/v1` Lease, so two operator
//! replicas never reconcile at once. The decision is a pure function of the
//! Lease and the time; the loop around it renews every `renew_every` and
//! reports leadership on a watch channel.
//!
//! A failed renewal (API server restarting, a timeout) does not end
//! leadership: the leader keeps going until its [`renew_deadline`], which ends
//! before the Lease can expire for the other replicas. On shutdown the leader
//! releases the Lease so the next replica takes over at once instead of
//! waiting for it to expire.

use std::future::Future;
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

/// How long a leader keeps acting on a Lease it could not renew: two thirds of
/// the lease duration (client-go's 10 s renew deadline of a 15 s lease), so it
/// stops before any other replica may take the Lease as expired.
pub fn renew_deadline(lease_duration: Duration) -> Duration {
    lease_duration * 2 / 3
}

/// Whether a leader whose last successful renewal was at `renewed` still
/// leads at `now`, after a round that could not reach the API (pure).
pub fn still_leading(renewed: Option<Timestamp>, lease_duration: Duration, now: Timestamp) -> bool {
    let deadline = SignedDuration::try_from(renew_deadline(lease_duration)).unwrap_or_default();
    renewed.is_some_and(|r| r.saturating_add(deadline).is_ok_and(|until| now < until))
}

/// What the renewal loop remembers between rounds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Leadership {
    /// When we last renewed (or acquired) the Lease; `None` while following.
    pub renewed: Option<Timestamp>,
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

    /// One round of the loop: whether we lead afterwards. An API error keeps
    /// a leader leading until its renew deadline; losing the race or finding
    /// another holder ends leadership at once.
    pub async fn step(&self, state: &mut Leadership, now: Timestamp) -> bool {
        match self.try_acquire_or_renew(now).await {
            Ok(true) => {
                state.renewed = Some(now);
                true
            }
            Ok(false) => {
                state.renewed = None;
                false
            }
            Err(err) => {
                let leading = still_leading(state.renewed, self.lease_duration, now);
                if leading {
                    tracing::warn!(error = %err, "lease renewal failed; still leading until the renew deadline");
                } else {
                    if state.renewed.is_some() {
                        tracing::warn!(error = %err, "lease renewal failed past the renew deadline: stepping down");
                    } else {
                        tracing::warn!(error = %err, "lease acquisition failed");
                    }
                    state.renewed = None;
                }
                leading
            }
        }
    }

    /// Gives the Lease up if we hold it: clears `holderIdentity` (and records
    /// the time), so the next replica acquires it on its next round. Returns
    /// whether we released it; a Lease someone else holds is left alone.
    pub async fn release(&self, now: Timestamp) -> Result<bool, kube::Error> {
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            return Ok(false);
        };
        let Some(spec) = lease.spec.as_mut() else {
            return Ok(false);
        };
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return Ok(false);
        }
        spec.holder_identity = None;
        spec.renew_time = Some(MicroTime(now));
        spec.lease_duration_seconds = Some(1);
        match self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(true),
            // Someone wrote first (took over): nothing left to release.
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
            Err(err) => Err(err),
        }
    }

    /// Renews until `stop` completes, publishing leadership on `leader`; then
    /// releases the Lease if we hold it. Complete `stop` only once the
    /// controllers have stopped, so two replicas never act at once.
    pub async fn run(
        self,
        leader: watch::Sender<bool>,
        renew_every: Duration,
        stop: impl Future<Output = ()>,
    ) {
        let mut state = Leadership::default();
        tokio::pin!(stop);
        loop {
            let held = self.step(&mut state, Timestamp::now()).await;
            leader.send_replace(held);
            tokio::select! {
                () = &mut stop => break,
                () = tokio::time::sleep(renew_every) => {}
            }
        }
        if state.renewed.is_some() {
            match self.release(Timestamp::now()).await {
                Ok(true) => tracing::info!("released the leader lease"),
                Ok(false) => {}
                Err(err) => {
                    tracing::warn!(error = %err, "releasing the leader lease failed; the next replica waits for it to expire")
                }
            }
        }
        leader.send_replace(false);
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
        let mut released = lease("a", 999);
        released.holder_identity = None;
        assert_eq!(decide(Some(&released), "b", now), Decision::Acquire);
    }

    #[test]
    fn a_leader_rides_out_failures_until_the_renew_deadline() {
        let at = |s: i64| Timestamp::from_second(s).expect("ts");
        let lease = Duration::from_secs(15);
        assert_eq!(renew_deadline(lease), Duration::from_secs(10));
        assert!(still_leading(Some(at(100)), lease, at(105)));
        assert!(still_leading(Some(at(100)), lease, at(109)));
        assert!(!still_leading(Some(at(100)), lease, at(110)));
        assert!(
            !still_leading(None, lease, at(100)),
            "a follower never leads on an error"
        );
    }
}
