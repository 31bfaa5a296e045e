//! Which DKIM key each bound domain signs with, given how long each key file
//! has been in the relays' aggregated Secret (pure).
//!
//! The kubelet refreshes the pods' ConfigMap and Secret volumes independently,
//! so a config naming a key file the Secret gained moments ago can reach a pod
//! before the file does, and the relay answers 451 for that domain. The
//! rotation waits [`MOUNT_GRACE`] after generating a key before activating it,
//! which covers the usual case (the relay reconciles as soon as the key is
//! generated). This is the guard for the unusual one, where the relay could
//! not reconcile in between: the Secret records when it gained each file, and
//! until the active key's file has been there for [`MOUNT_GRACE`] the config
//! keeps the key that signed before (retiring: still published in DNS, its
//! file still in the Secret).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::jiff::Timestamp;
use petrel_crds::status::DkimKeyEntry;

pub use crate::kubelet::MOUNT_GRACE;

/// Annotation on the aggregated Secret: JSON object, key file -> RFC 3339 time
/// it was first written.
pub const FILES_SINCE: &str = "petrel.dev/key-files-since";

/// When each of `files` has been in the aggregated Secret since: carried over
/// from the stored Secret, `now` for a file it lacks. A file the stored Secret
/// holds without a recorded time (written by an older operator) counts as
/// long mounted.
pub fn files_since<'a>(
    stored: Option<&Secret>,
    files: impl Iterator<Item = &'a String>,
    now: Timestamp,
) -> BTreeMap<String, Timestamp> {
    let recorded: BTreeMap<String, Timestamp> = stored
        .and_then(|s| s.metadata.annotations.as_ref())
        .and_then(|a| a.get(FILES_SINCE))
        .and_then(|v| serde_json::from_str(v).ok())
        .unwrap_or_default();
    let held = |file: &str| {
        stored
            .and_then(|s| s.data.as_ref())
            .is_some_and(|d| d.contains_key(file))
    };
    files
        .map(|file| {
            let since = match recorded.get(file) {
                Some(t) if held(file) => *t,
                _ if held(file) => Timestamp::UNIX_EPOCH,
                _ => now,
            };
            (file.clone(), since)
        })
        .collect()
}

/// The annotation value for [`FILES_SINCE`].
pub fn since_annotation(since: &BTreeMap<String, Timestamp>) -> String {
    serde_json::to_string(since).unwrap_or_default()
}

/// The key a domain signs with now, and when to look again if that is not yet
/// the active key. `file` names a key's file in the aggregated Secret.
pub fn signing_key(
    active: &DkimKeyEntry,
    retiring: &[DkimKeyEntry],
    since: &BTreeMap<String, Timestamp>,
    file: &dyn Fn(&DkimKeyEntry) -> String,
    now: Timestamp,
) -> (DkimKeyEntry, Option<Timestamp>) {
    let mounted_at = |key: &DkimKeyEntry| {
        since
            .get(&file(key))
            .map(|t| t.saturating_add(MOUNT_GRACE).unwrap_or(Timestamp::MAX))
    };
    let Some(ready) = mounted_at(active) else {
        return (active.clone(), None);
    };
    if ready <= now {
        return (active.clone(), None);
    }
    let previous = retiring
        .iter()
        .filter(|k| mounted_at(k).is_some_and(|t| t <= now))
        .max_by_key(|k| k.retired_at.as_ref().map(|t| t.0));
    match previous {
        Some(previous) => (previous.clone(), Some(ready)),
        // Nothing signed before (a new domain): the active key is the only choice.
        None => (active.clone(), None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::ByteString;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use petrel_crds::status::{DkimAlgorithm, DkimKeyPhase};

    fn entry(selector: &str, phase: DkimKeyPhase) -> DkimKeyEntry {
        DkimKeyEntry {
            selector: selector.into(),
            algorithm: DkimAlgorithm::Ed25519,
            secret_name: selector.into(),
            dns_value: String::new(),
            phase,
            created_at: Time(Timestamp::UNIX_EPOCH),
            published_at: None,
            activated_at: None,
            retired_at: Some(Time(Timestamp::UNIX_EPOCH)),
        }
    }

    fn file(k: &DkimKeyEntry) -> String {
        format!("{}.pem", k.selector)
    }

    #[test]
    fn new_files_start_now_and_old_ones_carry_over() {
        let t0 = Timestamp::from_second(1_800_000_000).expect("ts");
        let now = t0.saturating_add(MOUNT_GRACE).expect("ts");
        let stored = Secret {
            data: Some(BTreeMap::from([
                ("a.pem".to_string(), ByteString(vec![])),
                ("legacy.pem".to_string(), ByteString(vec![])),
            ])),
            metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
                annotations: Some(BTreeMap::from([(
                    FILES_SINCE.to_string(),
                    since_annotation(&BTreeMap::from([
                        ("a.pem".to_string(), t0),
                        ("gone.pem".to_string(), t0),
                    ])),
                )])),
                ..Default::default()
            },
            ..Default::default()
        };
        let files = ["a.pem", "legacy.pem", "gone.pem", "new.pem"].map(String::from);
        let since = files_since(Some(&stored), files.iter(), now);
        assert_eq!(since["a.pem"], t0);
        assert_eq!(since["legacy.pem"], Timestamp::UNIX_EPOCH);
        assert_eq!(since["gone.pem"], now, "re-added after removal: new again");
        assert_eq!(since["new.pem"], now);
        assert_eq!(files_since(None, files.iter(), now)["a.pem"], now);
    }

    #[test]
    fn previous_key_signs_until_the_new_file_is_mounted() {
        let now = Timestamp::from_second(1_800_000_000).expect("ts");
        let active = entry("new", DkimKeyPhase::Active);
        let old = entry("old", DkimKeyPhase::Retiring);
        let since = BTreeMap::from([
            ("new.pem".to_string(), now),
            ("old.pem".to_string(), Timestamp::UNIX_EPOCH),
        ]);
        let (key, recheck) = signing_key(&active, std::slice::from_ref(&old), &since, &file, now);
        assert_eq!(key.selector, "old");
        let ready = now.saturating_add(MOUNT_GRACE).expect("ts");
        assert_eq!(recheck, Some(ready));
        let (key, recheck) = signing_key(&active, &[old], &since, &file, ready);
        assert_eq!(key.selector, "new");
        assert_eq!(recheck, None);
        // No earlier key: the active one is the only choice.
        let (key, _) = signing_key(&active, &[], &since, &file, now);
        assert_eq!(key.selector, "new");
    }
}
