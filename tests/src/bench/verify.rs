//! The verdict of a fault test: was every accepted message delivered, and
//! none more often than allowed?

use std::collections::HashMap;

use super::sink::Arrival;

/// What went wrong, per message id.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// Accepted (250) but never arrived: lost.
    pub missing: Vec<String>,
    /// Arrived with fewer recipients than were accepted.
    pub short: Vec<(String, u32)>,
    /// Arrived more often than allowed.
    pub duplicated: Vec<(String, u32)>,
    /// Arrived although the client never got 250 for it (and it was not
    /// "unknown", i.e. the client did see a refusal): a refusal that lied.
    pub refused_but_delivered: Vec<String>,
}

impl Verdict {
    /// No problem at all.
    pub fn is_clean(&self) -> bool {
        self.missing.is_empty()
            && self.short.is_empty()
            && self.duplicated.is_empty()
            && self.refused_but_delivered.is_empty()
    }

    /// A short description for assertion messages (first few ids of each).
    pub fn summary(&self) -> String {
        fn first<T: std::fmt::Debug>(v: &[T]) -> String {
            format!("{} {:?}", v.len(), &v[..v.len().min(5)])
        }
        format!(
            "missing {}, short {}, duplicated {}, refused-but-delivered {}",
            first(&self.missing),
            first(&self.short),
            first(&self.duplicated),
            first(&self.refused_but_delivered)
        )
    }
}

/// Checks `arrivals` (from the sink) against what the clients were told.
/// `accepted`: ids that got 250; `refused`: ids that got a 4xx/5xx reply;
/// `recipients`: recipients per message; `max_deliveries`: 1 for exactly
/// once, 2 when a crash may legitimately cause one redelivery.
pub fn verify(
    accepted: &[String],
    refused: &[String],
    arrivals: &HashMap<String, Arrival>,
    recipients: u32,
    max_deliveries: u32,
) -> Verdict {
    let mut v = Verdict::default();
    for id in accepted {
        match arrivals.get(id) {
            None => v.missing.push(id.clone()),
            Some(a) => {
                // Each delivery carries all recipients of one unit; duplicates
                // may add more, so compare per delivery.
                if a.recipients < recipients {
                    v.short.push((id.clone(), a.recipients));
                }
                if a.deliveries > max_deliveries {
                    v.duplicated.push((id.clone(), a.deliveries));
                }
            }
        }
    }
    for id in refused {
        if arrivals.contains_key(id) {
            v.refused_but_delivered.push(id.clone());
        }
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn arrival(deliveries: u32, recipients: u32) -> Arrival {
        Arrival {
            deliveries,
            recipients,
        }
    }

    #[test]
    fn verdicts() {
        let arrivals: HashMap<String, Arrival> = [
            ("once".to_string(), arrival(1, 2)),
            ("twice".to_string(), arrival(2, 4)),
            ("thrice".to_string(), arrival(3, 6)),
            ("half".to_string(), arrival(1, 1)),
            ("liar".to_string(), arrival(1, 2)),
        ]
        .into();
        let ids = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let clean = verify(&ids(&["once", "twice"]), &[], &arrivals, 2, 2);
        assert!(clean.is_clean(), "{}", clean.summary());
        let exactly_once = verify(&ids(&["once", "twice"]), &[], &arrivals, 2, 1);
        assert_eq!(exactly_once.duplicated, vec![("twice".to_string(), 2)]);
        let bad = verify(
            &ids(&["once", "thrice", "half", "lost"]),
            &ids(&["liar", "never"]),
            &arrivals,
            2,
            2,
        );
        assert_eq!(bad.missing, ids(&["lost"]));
        assert_eq!(bad.short, vec![("half".to_string(), 1)]);
        assert_eq!(bad.duplicated, vec![("thrice".to_string(), 3)]);
        assert_eq!(bad.refused_but_delivered, ids(&["liar"]));
        assert!(!bad.is_clean());
    }
}
