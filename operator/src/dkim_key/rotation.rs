//! The DKIM rotation state machine, as pure functions of (status, policy, now,
//! what DNS serves). [`decide`] names the one next transition (or how long to
//! wait); [`apply`] performs it on the status. The reconciler loops over the
//! two, generating a key when told to, so every step is an Event and a
//! timestamp in status, and tests walk a whole rotation with a fake clock.
//!
//! Invariants: there is never more than one active key; a key only becomes
//! active once it is Published (DNS serves it, or with `verifyDns: false` the
//! publish delay passed); the active key keeps signing until its successor
//! is Published, however long DNS takes.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use petrel_crds::dkim_key::{DkimKeySpec, DkimKeyStatus};
use petrel_crds::status::{DkimAlgorithm, DkimKeyEntry, DkimKeyPhase};

use crate::error::{InvalidSpec, parse_duration};

pub use crate::kubelet::MOUNT_GRACE;

/// Rotation timing of one DkimKey, parsed and checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Policy {
    /// Age at which the active key is replaced.
    pub every: SignedDuration,
    /// How long before `every` the next key is generated.
    pub publish_ahead: SignedDuration,
    /// How long a replaced key stays published.
    pub retire_after: SignedDuration,
    /// Wait for DNS to serve a key before it signs.
    pub verify_dns: bool,
}

impl Policy {
    /// Parses the spec's durations; `publishAhead` must be shorter than `every`.
    pub fn from_spec(spec: &DkimKeySpec) -> Result<Self, InvalidSpec> {
        let d = |field: &str, value: &str| -> Result<SignedDuration, InvalidSpec> {
            let std = parse_duration(field, value)?;
            SignedDuration::try_from(std)
                .map_err(|_| InvalidSpec::new("InvalidDuration", format!("{field}: too long")))
        };
        let policy = Self {
            every: d("spec.rotation.every", &spec.rotation.every)?,
            publish_ahead: d("spec.rotation.publishAhead", &spec.rotation.publish_ahead)?,
            retire_after: d("spec.rotation.retireAfter", &spec.rotation.retire_after)?,
            verify_dns: spec.verify_dns,
        };
        if policy.every.is_zero() {
            return Err(InvalidSpec::new(
                "InvalidRotation",
                "spec.rotation.every must be longer than zero",
            ));
        }
        if policy.publish_ahead >= policy.every {
            return Err(InvalidSpec::new(
                "InvalidRotation",
                format!(
                    "spec.rotation.publishAhead ({}) must be shorter than spec.rotation.every ({})",
                    spec.rotation.publish_ahead, spec.rotation.every
                ),
            ));
        }
        Ok(policy)
    }
}

/// One step of the rotation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Transition {
    /// A new key is needed: the first one, a scheduled successor, or a requested rotation.
    Generate,
    /// The next key's record is served (or the publish delay passed): it may sign.
    Publish {
        /// Selector of the next key.
        selector: String,
    },
    /// The next key starts signing; the active key starts retiring.
    Activate {
        /// Selector of the key that becomes active.
        selector: String,
    },
    /// A retiring key's `retireAfter` passed: drop its record and Secret.
    Remove {
        /// Selector of the removed key.
        selector: String,
        /// Its Secret, to delete.
        secret_name: String,
    },
}

impl Transition {
    /// CamelCase reason for the Event recording this transition.
    pub fn reason(&self) -> &'static str {
        match self {
            Transition::Generate => "KeyGenerated",
            Transition::Publish { .. } => "KeyPublished",
            Transition::Activate { .. } => "KeyActivated",
            Transition::Remove { .. } => "KeyRemoved",
        }
    }
}

/// Nothing to do now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Wait {
    /// When a timer fires next (`None`: only a change or DNS can move things).
    pub until: Option<Timestamp>,
    /// A key waits for DNS: poll DNS again soon.
    pub polling_dns: bool,
}

fn at(time: &Time, plus: SignedDuration) -> Timestamp {
    time.0.saturating_add(plus).unwrap_or(Timestamp::MAX)
}

/// The next transition, or how long nothing needs to happen.
///
/// `served` says whether DNS serves a key's record exactly.
pub fn decide(
    status: &DkimKeyStatus,
    policy: &Policy,
    now: Timestamp,
    served: &dyn Fn(&DkimKeyEntry) -> bool,
) -> Result<Transition, Wait> {
    let mut timers: Vec<Timestamp> = Vec::new();
    let mut polling_dns = false;
    let requested = status.rotation_requested_at.is_some();

    for key in &status.retiring {
        let Some(retired) = &key.retired_at else {
            // A retiring key without a timestamp (edited by hand): drop it now.
            return Ok(remove(key));
        };
        let until = at(retired, policy.retire_after.max(MOUNT_GRACE));
        if now >= until {
            return Ok(remove(key));
        }
        timers.push(until);
    }

    match (&status.active, &status.next) {
        (None, None) => return Ok(Transition::Generate),
        (active, Some(next)) if next.phase == DkimKeyPhase::Pending => {
            let ready = if policy.verify_dns {
                polling_dns = true;
                served(next)
            } else if active.is_none() {
                // Nothing signs yet and DNS cannot be checked: waiting gains nothing.
                true
            } else {
                let until = at(&next.created_at, policy.publish_ahead);
                timers.push(until);
                now >= until
            };
            if ready {
                return Ok(Transition::Publish {
                    selector: next.selector.clone(),
                });
            }
        }
        (None, Some(next)) => {
            return Ok(Transition::Activate {
                selector: next.selector.clone(),
            });
        }
        (Some(active), Some(next)) => {
            // A switch never outruns the kubelet: see MOUNT_GRACE.
            let mounted = at(&next.created_at, MOUNT_GRACE);
            let due = if requested {
                mounted
            } else {
                activation_due(active, policy).max(mounted)
            };
            if now >= due {
                return Ok(Transition::Activate {
                    selector: next.selector.clone(),
                });
            }
            timers.push(due);
        }
        (Some(active), None) => {
            let due = activation_due(active, policy);
            let generate_at = due.saturating_sub(policy.publish_ahead).unwrap_or(due);
            if requested || now >= generate_at {
                return Ok(Transition::Generate);
            }
            timers.push(generate_at);
        }
    }
    Err(Wait {
        until: timers.into_iter().min(),
        polling_dns,
    })
}

fn activation_due(active: &DkimKeyEntry, policy: &Policy) -> Timestamp {
    let since = active.activated_at.as_ref().unwrap_or(&active.created_at);
    at(since, policy.every)
}

fn remove(key: &DkimKeyEntry) -> Transition {
    Transition::Remove {
        selector: key.selector.clone(),
        secret_name: key.secret_name.clone(),
    }
}

/// Performs a transition on the status. `generated` is the new key for
/// [`Transition::Generate`] (ignored otherwise).
pub fn apply(
    status: &mut DkimKeyStatus,
    transition: &Transition,
    now: Timestamp,
    generated: Option<DkimKeyEntry>,
) {
    let now = Time(now);
    match transition {
        Transition::Generate => {
            if let Some(mut key) = generated {
                key.phase = DkimKeyPhase::Pending;
                key.created_at = now;
                status.next = Some(key);
            }
        }
        Transition::Publish { selector } => {
            if let Some(next) = status.next.as_mut().filter(|n| &n.selector == selector) {
                next.phase = DkimKeyPhase::Published;
                next.published_at = Some(now);
            }
        }
        Transition::Activate { selector } => {
            if let Some(mut next) = status.next.take_if(|n| &n.selector == selector) {
                next.phase = DkimKeyPhase::Active;
                next.activated_at = Some(now.clone());
                if let Some(mut old) = status.active.replace(next) {
                    old.phase = DkimKeyPhase::Retiring;
                    old.retired_at = Some(now);
                    status.retiring.push(old);
                }
                status.rotation_requested_at = None;
            }
        }
        Transition::Remove { selector, .. } => {
            status.retiring.retain(|k| &k.selector != selector);
        }
    }
}

/// A selector for a new key: `<prefix>-<YYYYMMDDhhmm>`, with `-2`, `-3`... when
/// that is taken (two rotations in one minute).
pub fn new_selector<'a>(
    prefix: &str,
    now: Timestamp,
    taken: impl Iterator<Item = &'a str> + Clone,
) -> String {
    let base = format!("{prefix}-{}", now.strftime("%Y%m%d%H%M"));
    let mut candidate = base.clone();
    let mut n = 1;
    while taken.clone().any(|t| t == candidate) {
        n += 1;
        candidate = format!("{base}-{n}");
    }
    candidate
}

pub use crate::names::key_secret_name as secret_name;

/// A new key entry (phase Pending) from generated material.
pub fn new_entry(
    selector: String,
    secret_name: String,
    algorithm: DkimAlgorithm,
    dns_value: String,
    now: Timestamp,
) -> DkimKeyEntry {
    DkimKeyEntry {
        selector,
        algorithm,
        secret_name,
        dns_value,
        phase: DkimKeyPhase::Pending,
        created_at: Time(now),
        published_at: None,
        activated_at: None,
        retired_at: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::{Clock, FakeClock};
    use std::collections::BTreeSet;
    use std::time::Duration;

    const DAY: Duration = Duration::from_secs(86400);

    fn policy(verify_dns: bool) -> Policy {
        let spec: DkimKeySpec = serde_yaml::from_str(&format!(
            "{{domain: example.com, rotation: {{every: 30d, publishAhead: 2d, retireAfter: 3d}}, verifyDns: {verify_dns}}}"
        ))
        .expect("spec");
        Policy::from_spec(&spec).expect("valid policy")
    }

    /// Drives the state machine like the reconciler: apply transitions until it waits.
    struct Harness {
        clock: FakeClock,
        status: DkimKeyStatus,
        policy: Policy,
        dns: BTreeSet<String>,
        log: Vec<String>,
    }

    impl Harness {
        fn new(verify_dns: bool) -> Self {
            Self {
                clock: FakeClock::new(Timestamp::from_second(1_790_000_000).expect("ts")),
                status: DkimKeyStatus::default(),
                policy: policy(verify_dns),
                dns: BTreeSet::new(),
                log: Vec::new(),
            }
        }

        fn run(&mut self) -> Wait {
            for _ in 0..10 {
                let now = self.clock.now();
                let dns = self.dns.clone();
                let served = move |k: &DkimKeyEntry| dns.contains(&k.selector);
                match decide(&self.status, &self.policy, now, &served) {
                    Ok(t) => {
                        let generated = (t == Transition::Generate).then(|| {
                            let taken: Vec<String> = self
                                .status
                                .published_keys()
                                .map(|k| k.selector.clone())
                                .collect();
                            let selector = new_selector("p", now, taken.iter().map(String::as_str));
                            new_entry(
                                selector.clone(),
                                secret_name("dk", &selector),
                                DkimAlgorithm::Ed25519,
                                format!("v=DKIM1; k=ed25519; p={selector}"),
                                now,
                            )
                        });
                        self.log.push(t.reason().to_string());
                        apply(&mut self.status, &t, now, generated);
                    }
                    Err(wait) => return wait,
                }
            }
            panic!("state machine did not settle: {:?}", self.log);
        }

        fn active(&self) -> Option<&str> {
            self.status.active.as_ref().map(|k| k.selector.as_str())
        }

        fn next(&self) -> Option<(&str, DkimKeyPhase)> {
            self.status
                .next
                .as_ref()
                .map(|k| (k.selector.as_str(), k.phase))
        }

        fn publish_next_in_dns(&mut self) {
            let selector = self
                .status
                .next
                .as_ref()
                .expect("next key")
                .selector
                .clone();
            self.dns.insert(selector);
        }

        fn take_log(&mut self) -> Vec<String> {
            std::mem::take(&mut self.log)
        }
    }

    #[test]
    fn full_rotation_with_dns_verification() {
        let mut h = Harness::new(true);
        // First key: generated, but does not sign until DNS serves it.
        let wait = h.run();
        assert_eq!(h.take_log(), ["KeyGenerated"]);
        assert!(wait.polling_dns);
        assert_eq!(h.active(), None);
        let first = h.next().expect("pending first key").0.to_string();
        assert_eq!(h.next().map(|n| n.1), Some(DkimKeyPhase::Pending));

        h.clock.advance(Duration::from_secs(600));
        h.run();
        assert!(h.take_log().is_empty(), "nothing moves without DNS");

        h.publish_next_in_dns();
        let wait = h.run();
        assert_eq!(h.take_log(), ["KeyPublished", "KeyActivated"]);
        assert_eq!(h.active(), Some(first.as_str()));
        assert_eq!(h.next(), None);
        let activated = h.clock.now();
        // Next timer: generate the successor publishAhead before every.
        assert_eq!(
            wait.until,
            Some(
                activated
                    .saturating_add(SignedDuration::from_hours(28 * 24))
                    .expect("ts")
            )
        );

        // 27 days: nothing. 28 days: the next key is generated.
        h.clock.advance(27 * DAY);
        h.run();
        assert!(h.take_log().is_empty());
        h.clock.advance(DAY);
        h.run();
        assert_eq!(h.take_log(), ["KeyGenerated"]);
        let second = h.next().expect("next").0.to_string();
        assert_ne!(second, first);
        assert_eq!(h.active(), Some(first.as_str()), "old key keeps signing");

        // DNS serves it a day later: published, but the switch waits for day 30.
        h.clock.advance(DAY);
        h.publish_next_in_dns();
        h.run();
        assert_eq!(h.take_log(), ["KeyPublished"]);
        assert_eq!(h.active(), Some(first.as_str()));
        h.clock.advance(DAY);
        h.run();
        assert_eq!(h.take_log(), ["KeyActivated"]);
        assert_eq!(h.active(), Some(second.as_str()));
        assert_eq!(h.status.retiring.len(), 1);
        assert_eq!(h.status.retiring[0].selector, first);
        assert_eq!(h.status.retiring[0].phase, DkimKeyPhase::Retiring);
        // Both records published: the retiring one for mail in flight.
        assert_eq!(h.status.published_keys().count(), 2);

        // retireAfter (3d) later the old key goes, its Secret with it.
        h.clock.advance(3 * DAY - Duration::from_secs(1));
        h.run();
        assert!(h.take_log().is_empty());
        h.clock.advance(Duration::from_secs(1));
        h.run();
        assert_eq!(h.take_log(), ["KeyRemoved"]);
        assert!(h.status.retiring.is_empty());
        assert_eq!(h.active(), Some(second.as_str()));
    }

    #[test]
    fn slow_dns_never_stops_signing() {
        let mut h = Harness::new(true);
        h.run();
        h.publish_next_in_dns();
        h.run();
        let first = h.active().expect("active").to_string();
        h.clock.advance(28 * DAY);
        h.run();
        h.take_log();
        // DNS never serves the new key: well past `every`, the old key still signs.
        h.clock.advance(30 * DAY);
        let wait = h.run();
        assert!(h.take_log().is_empty());
        assert!(wait.polling_dns);
        assert_eq!(h.active(), Some(first.as_str()));
        assert_eq!(h.next().map(|n| n.1), Some(DkimKeyPhase::Pending));
    }

    #[test]
    fn without_dns_verification_time_alone_decides() {
        let mut h = Harness::new(false);
        h.run();
        // Nothing signs yet and DNS cannot be checked: the first key signs at once.
        assert_eq!(
            h.take_log(),
            ["KeyGenerated", "KeyPublished", "KeyActivated"]
        );
        h.clock.advance(28 * DAY);
        let wait = h.run();
        assert_eq!(h.take_log(), ["KeyGenerated"]);
        assert!(!wait.polling_dns);
        assert_eq!(
            wait.until,
            Some(
                h.clock
                    .now()
                    .saturating_add(SignedDuration::from_hours(48))
                    .expect("ts")
            )
        );
        h.clock.advance(2 * DAY);
        h.run();
        assert_eq!(h.take_log(), ["KeyPublished", "KeyActivated"]);
    }

    #[test]
    fn requested_rotation_starts_at_once_and_switches_when_served() {
        let mut h = Harness::new(true);
        h.run();
        h.publish_next_in_dns();
        h.run();
        h.take_log();
        h.status.rotation_requested_at = Some(Time(h.clock.now()));
        h.run();
        assert_eq!(h.take_log(), ["KeyGenerated"]);
        h.publish_next_in_dns();
        let wait = h.run();
        // DNS serves it at once, but the relays' Secret volume may not hold the
        // file yet: the switch waits for MOUNT_GRACE after generation.
        assert_eq!(h.take_log(), ["KeyPublished"]);
        let generated = h.status.next.as_ref().expect("next").created_at.0;
        let mounted = generated.saturating_add(MOUNT_GRACE).expect("ts");
        assert_eq!(wait.until, Some(mounted));
        h.clock
            .advance(Duration::from_secs(MOUNT_GRACE.as_secs() as u64));
        h.run();
        assert_eq!(h.take_log(), ["KeyActivated"]);
        assert!(h.status.rotation_requested_at.is_none());
        assert_eq!(h.status.retiring.len(), 1);
    }

    #[test]
    fn zero_retire_after_keeps_the_old_file_until_pods_switched() {
        let spec: DkimKeySpec = serde_yaml::from_str(
            "{domain: example.com, rotation: {every: 30d, publishAhead: 2d, retireAfter: 0s}}",
        )
        .expect("spec");
        let mut h = Harness::new(true);
        h.policy = Policy::from_spec(&spec).expect("valid policy");
        h.run();
        h.publish_next_in_dns();
        h.run();
        h.clock.advance(28 * DAY);
        h.run();
        h.publish_next_in_dns();
        h.take_log();
        h.clock.advance(2 * DAY);
        let wait = h.run();
        assert_eq!(h.take_log(), ["KeyPublished", "KeyActivated"]);
        // Pods may still read the old selector from a stale ConfigMap volume.
        assert_eq!(h.status.retiring.len(), 1);
        assert_eq!(
            wait.until,
            Some(h.clock.now().saturating_add(MOUNT_GRACE).expect("ts"))
        );
        h.clock
            .advance(Duration::from_secs(MOUNT_GRACE.as_secs() as u64));
        h.run();
        assert_eq!(h.take_log(), ["KeyRemoved"]);
    }

    #[test]
    fn policy_checks() {
        let spec: DkimKeySpec =
            serde_yaml::from_str("{domain: example.com, rotation: {every: 1d, publishAhead: 2d}}")
                .expect("spec");
        let err = Policy::from_spec(&spec).expect_err("publishAhead >= every");
        assert_eq!(err.reason, "InvalidRotation");
    }

    #[test]
    fn selectors_and_secret_names() {
        let now = Timestamp::from_second(1_790_000_000).expect("ts");
        let s = new_selector("petrel", now, std::iter::empty());
        assert_eq!(s, "petrel-202609211413");
        let taken = [s.as_str()];
        assert_eq!(
            new_selector("petrel", now, taken.iter().copied()),
            format!("{s}-2")
        );
        assert_eq!(secret_name("example-com", &s), format!("example-com-{s}"));
        let long = "a".repeat(300);
        assert!(secret_name(&long, &s).len() <= 253);
    }
}
